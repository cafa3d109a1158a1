package demo.spring;

import demo.spring.consumer.ConsumerApp;
import demo.spring.provider.ProviderApp;
import java.util.Arrays;
import java.util.Map;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.WebApplicationType;

/**
 * The Spring Cloud Greeter: {@code provider} (a REST service registered in the discovery
 * registry) or {@code consumer} (finds it through the registry and calls it). Everything else
 * is ordinary Spring properties, e.g. with Nacos:
 *
 * <pre>
 * java -jar spring-nacos.jar provider --spring.cloud.nacos.discovery.server-addr=10.0.0.15:8848 \
 *      --server.port=8080 --demo.id=cloud-1
 * java -jar spring-nacos.jar consumer --spring.cloud.nacos.discovery.server-addr=10.0.0.15:8848 \
 *      --demo.calls=20 [--demo.client=feign]
 * </pre>
 *
 * and with ZooKeeper {@code --spring.cloud.zookeeper.connect-string=10.0.0.14:2181}.
 */
public final class Main {
    private Main() {}

    public static void main(String[] args) {
        String role = args.length > 0 ? args[0] : "";
        String[] rest = Arrays.copyOfRange(args, Math.min(1, args.length), args.length);
        if (role.equals("provider")) {
            SpringApplication app = new SpringApplication(ProviderApp.class);
            app.setDefaultProperties(Map.of("spring.application.name", "greeter"));
            app.run(rest);
        } else if (role.equals("consumer")) {
            SpringApplication app = new SpringApplication(ConsumerApp.class);
            app.setWebApplicationType(WebApplicationType.NONE);
            app.setDefaultProperties(Map.of("spring.application.name", "greeter-consumer"));
            System.exit(SpringApplication.exit(app.run(rest)));
        } else {
            System.err.println("usage: java -jar spring-{nacos,zk}.jar provider|consumer [--key=value...]");
            System.exit(2);
        }
    }
}
