package demo.spring.consumer;

import demo.common.Report;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.CommandLineRunner;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.client.loadbalancer.LoadBalanced;
import org.springframework.cloud.openfeign.EnableFeignClients;
import org.springframework.cloud.openfeign.FeignClient;
import org.springframework.context.annotation.Bean;
import org.springframework.web.bind.annotation.GetMapping;
import org.springframework.web.bind.annotation.RequestParam;
import org.springframework.web.client.RestTemplate;

/**
 * The Greeter consumer: makes {@code demo.calls} calls (10 by default) to service
 * {@code greeter} through Spring Cloud LoadBalancer, with a {@code @LoadBalanced RestTemplate}
 * or, with {@code --demo.client=feign}, an OpenFeign client; one line per call and a summary
 * (demo.common.Report), then exits.
 */
@SpringBootApplication
@EnableFeignClients
public class ConsumerApp {
    /** The provider, as an OpenFeign client. */
    @FeignClient(name = "greeter")
    public interface GreeterClient {
        @GetMapping("/hello")
        String hello(@RequestParam("name") String name);
    }

    @Bean
    @LoadBalanced
    RestTemplate restTemplate() {
        return new RestTemplate();
    }

    @Bean
    CommandLineRunner calls(RestTemplate rest, GreeterClient feign,
            @Value("${demo.calls:10}") int calls, @Value("${demo.client:rest}") String client) {
        return args -> Report.calls(calls, i -> client.equals("feign")
                ? feign.hello("call-" + i)
                : rest.getForObject("http://greeter/hello?name=call-" + i, String.class));
    }
}
