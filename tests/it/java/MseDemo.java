// A tiny Dubbo-style provider and consumer over Debian's ZooKeeper client, for the
// end-to-end tests of `mse-vpn run` (tests/it/reverse.rs). Not a Dubbo implementation: it
// registers and discovers providers the way Dubbo's classic ZooKeeper registry lays them out
// (/dubbo/SERVICE/providers/URL-ENCODED-URL, ephemeral), and reads the address to register
// the way Dubbo 2.7.2+ does (DUBBO_IP_TO_REGISTRY / DUBBO_PORT_TO_REGISTRY, from the
// environment, then from system properties).
//
//   java MseDemo props                        print the registration properties, exit 3
//   java MseDemo provider ZK SERVICE PORT     register, then answer "hello NAME" lines
//   java MseDemo consumer ZK SERVICE NAME     look the provider up and call it once

import java.io.*;
import java.net.*;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.apache.zookeeper.*;

public class MseDemo {
    static String knob(String name) {
        String v = System.getenv(name);
        return v != null ? v : System.getProperty(name);
    }

    static ZooKeeper connect(String zk) throws Exception {
        CountDownLatch up = new CountDownLatch(1);
        ZooKeeper z = new ZooKeeper(zk, 15000, e -> {
            if (e.getState() == Watcher.Event.KeeperState.SyncConnected) up.countDown();
        });
        if (!up.await(20, TimeUnit.SECONDS)) throw new IOException("no ZooKeeper at " + zk);
        return z;
    }

    static void ensure(ZooKeeper z, String path) throws Exception {
        try {
            z.create(path, new byte[0], ZooDefs.Ids.OPEN_ACL_UNSAFE, CreateMode.PERSISTENT);
        } catch (KeeperException.NodeExistsException e) {
            // fine
        }
    }

    public static void main(String[] a) throws Exception {
        switch (a[0]) {
            case "props": {
                for (String p : new String[] {"DUBBO_IP_TO_REGISTRY", "DUBBO_PORT_TO_REGISTRY",
                        "spring.cloud.nacos.discovery.ip", "spring.cloud.nacos.discovery.port",
                        "hsf.server.ip", "hsf.server.port", "keep.me"}) {
                    System.out.println("prop " + p + "=" + System.getProperty(p));
                }
                System.out.println("user " + System.getProperty("user.name"));
                System.exit(3);
            }
            case "provider": {
                String service = a[2];
                int port = Integer.parseInt(a[3]);
                ServerSocket server = new ServerSocket();
                server.bind(new InetSocketAddress("0.0.0.0", port));
                String ip = knob("DUBBO_IP_TO_REGISTRY");
                String regPort = knob("DUBBO_PORT_TO_REGISTRY");
                if (ip == null) ip = InetAddress.getLocalHost().getHostAddress();
                if (regPort == null) regPort = String.valueOf(port);
                String url = "dubbo://" + ip + ":" + regPort + "/" + service
                        + "?anyhost=true&side=provider&interface=" + service;
                ZooKeeper z = connect(a[1]);
                ensure(z, "/dubbo");
                ensure(z, "/dubbo/" + service);
                ensure(z, "/dubbo/" + service + "/providers");
                z.create("/dubbo/" + service + "/providers/"
                        + URLEncoder.encode(url, StandardCharsets.UTF_8), new byte[0],
                        ZooDefs.Ids.OPEN_ACL_UNSAFE, CreateMode.EPHEMERAL);
                System.out.println("registered " + url);
                System.out.flush();
                while (true) {
                    Socket c = server.accept();
                    new Thread(() -> {
                        try (c) {
                            BufferedReader in = new BufferedReader(new InputStreamReader(c.getInputStream()));
                            Writer out = new OutputStreamWriter(c.getOutputStream());
                            String line;
                            while ((line = in.readLine()) != null) {
                                out.write("hello " + line + " from the laptop; your address "
                                        + c.getInetAddress().getHostAddress() + "\n");
                                out.flush();
                            }
                        } catch (IOException e) {
                            // the caller went away
                        }
                    }).start();
                }
            }
            case "consumer": {
                ZooKeeper z = connect(a[1]);
                List<String> providers = z.getChildren("/dubbo/" + a[2] + "/providers", false);
                if (providers.isEmpty()) throw new IOException("no provider registered");
                URI url = URI.create(URLDecoder.decode(providers.get(0), StandardCharsets.UTF_8));
                System.out.println("found " + url);
                try (Socket s = new Socket()) {
                    s.connect(new InetSocketAddress(url.getHost(), url.getPort()), 5000);
                    s.setSoTimeout(10000);
                    Writer out = new OutputStreamWriter(s.getOutputStream());
                    out.write(a[3] + "\n");
                    out.flush();
                    System.out.println("reply " + new BufferedReader(
                            new InputStreamReader(s.getInputStream())).readLine());
                }
                z.close();
                break;
            }
            default:
                throw new IllegalArgumentException(a[0]);
        }
    }
}
